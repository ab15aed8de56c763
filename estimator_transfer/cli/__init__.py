"""Console scripts: the only part of the package that reads absl flags."""
import os

# TensorFlow reads this once, when it is first imported; the console scripts
# import it through the library, so the default must be set here (a user's own
# setting wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
