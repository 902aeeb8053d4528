"""k-means and the overclustering evaluation."""
