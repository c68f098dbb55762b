"""Quantization-aware training: the distillation trainer with every planned matrix on its exact block grid."""
