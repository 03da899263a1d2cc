"""The one error a kernel path raises, before any launch, for inputs it cannot take."""


class Unsupported(ValueError):
    """These kernels cannot take this spec or these tensors; str(self) says why. dispatch turns it
    into a fallback to the reference, with the reason kept in dispatch.fallback_reasons."""
