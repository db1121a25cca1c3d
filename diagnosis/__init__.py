"""Model diagnosis over activations (papers/004): activations in the store, query sets, diagnosis samples."""
