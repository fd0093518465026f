"""The image input format of the pretrained MNIST CNN (size, digit box, normalisation), in one place.

Separate so the preset loader, the site data readers and the model agree on one definition without the
numpy-only data code importing torch.
"""

from __future__ import annotations

#: MNIST's pixel mean and standard deviation, applied after scaling pixels to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: Model images are IMAGE_SIDE x IMAGE_SIDE grayscale.
IMAGE_SIDE = 28
#: The digit is drawn in the central DIGIT_SIDE x DIGIT_SIDE box, like MNIST (20x20 box, 4-pixel border).
DIGIT_SIDE = 20
