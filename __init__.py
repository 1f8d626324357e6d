"""FireRed Image Edit for ComfyUI -- the ComfyUI entry point.

ComfyUI imports this file under the folder name the pack was cloned into; everything below is
imported relatively. Importing does no work: the nodes load their models when they run.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
