"""megamix_launch: the Ray launcher behind ``megamix launch`` (DESIGN.md §1).

Installed as ``megamix_launch`` so it cannot collide with other packages.
"""
