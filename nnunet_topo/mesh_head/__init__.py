"""GCN mesh head (plain torch). Built in the mesh-head issue; empty for now."""
