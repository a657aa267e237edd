"""What the JAX and PyTorch mechanics share (`keras.ops` only): `block_float`, the block floating-point sums of
squares, and `mechanics.AccumulationMechanics`, the accumulation and the statistics step."""
