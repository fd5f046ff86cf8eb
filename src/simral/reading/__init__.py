"""Teleradiology: imaging requests, worklist, performed steps, reading tasks (DESIGN.md §7)."""
