"""k-means and the overclustering evaluation.

- :mod:`~posvit_cli.core.cluster.kmeans`: k-means (k-means++ seeding, bounded Lloyd iterations) on tensors.
- :mod:`~posvit_cli.core.cluster.projection`: per-dimension z-score and PCA of a store's tokens, streamed.
- :mod:`~posvit_cli.core.cluster.masks`: ground-truth masks on the evaluation grid, through the encoder's frame.
- :mod:`~posvit_cli.core.cluster.matching`: clusters to classes (Hungarian or greedy) and the matched IoU.
- :mod:`~posvit_cli.core.cluster.entropy`: the spatial entropy of a clustering (does it follow position?).
- :mod:`~posvit_cli.core.cluster.overclustering`: the evaluation protocols and k-means of a whole store.
"""
