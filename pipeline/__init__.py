"""Stage two and the encoders: everything that computes."""
