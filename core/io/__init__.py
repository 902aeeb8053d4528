"""Reading images and label masks, preprocessing and geometric transforms."""
