"""k-means and the overclustering evaluation.

- :mod:`~posvit_cli.core.cluster.kmeans`: k-means (k-means++ seeding, bounded Lloyd iterations) on tensors.
- :mod:`~posvit_cli.core.cluster.projection`: per-dimension z-score and PCA of a store's tokens, streamed.
- :mod:`~posvit_cli.core.cluster.masks`: ground-truth masks on the evaluation grid, through the encoder's frame.
- :mod:`~posvit_cli.core.cluster.matching`: clusters to classes (Hungarian or greedy) and the matched IoU.
- :mod:`~posvit_cli.core.cluster.position_dependence`: does a clustering follow position? Mutual information of
  cluster label and grid block against each image's label map rolled on the torus; p-value and dependence.
- :mod:`~posvit_cli.core.cluster.entropy`: the old spatial entropy (kept for its JSON keys; it does not separate
  position from content).
- :mod:`~posvit_cli.core.cluster.overclustering`: the evaluation protocols and k-means of a whole store.
"""
