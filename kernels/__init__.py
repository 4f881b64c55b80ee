"""ForgeRL's Triton kernels: one package per op (float32 reference, Triton variant, public function)."""
