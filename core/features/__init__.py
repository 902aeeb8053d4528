"""Feature stores, encoders and extraction: images in, patch tokens out."""
