"""Generated micrographs and textures with ground truth, for the demo and the tests.

- :mod:`~posvit_cli.core.synthetic.fields`: periodic random fields and geometry on a torus.
- :mod:`~posvit_cli.core.synthetic.structures`: the kinds, and their noise-free images and masks.
- :mod:`~posvit_cli.core.synthetic.acquisition`: the microscope (blur, illumination, noise).
- :mod:`~posvit_cli.core.synthetic.scribbles`: sparse training strokes inside a mask's classes.
- :mod:`~posvit_cli.core.synthetic.generate`: one sample (image, mask, scribbles) from one seed.
"""
