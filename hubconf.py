"""torch.hub entry points, one per released variant: torch.hub.load("<repository>", "glnet_4g", pretrained=True)."""
import functools

import glnet

dependencies = ["torch", "torchvision", "einops"]
globals().update({name: functools.partial(glnet.create_model, name) for name in glnet.RELEASED})
