"""FCN-16s (Long et al. 2015): the FCN-8s config (configs/fcn8s.py) with
the pool4 skip only and x16 final upsampling."""
from configs import fcn8s


def get_config(arg=None):
    c = fcn8s.get_config(arg)
    c.model.variant = "16s"
    c.train.freeze = ("upscore16",)  # the paper keeps the final upsampling bilinear
    return c
