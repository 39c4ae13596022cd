"""Training modes: what an agent trains, which tensors travel, and how the coordinator checks and combines them."""
