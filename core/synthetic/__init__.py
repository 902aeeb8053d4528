"""Generated micrographs and textures with ground truth, for the demo and the tests."""
