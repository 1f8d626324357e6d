"""ComfyUI nodes of the pack (classic V1 node API). Each node resolves its inputs and calls one
``firered_core`` function; no logic lives here. The node set arrives with the ComfyUI-nodes issue."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
