"""The one owner of the on-disk checkpoint format: layout, atomic publish, save, load."""
