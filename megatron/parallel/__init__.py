"""All communication lives here: expert all-to-all, gradient reduction, gradient norm."""
