"""The fetch stage: studies pulled from a PACS that pushes nothing (C-FIND, then C-MOVE to the node's own AE).

The retrieved instances arrive through the node's own storage SCP, so they are stored, completed and routed as
pushed ones are.
"""
