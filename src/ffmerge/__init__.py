"""ffmerge: compress Transformers by aligning, merging and tying adjacent feed-forward sublayers.

Method: Verma, Murray and Duh (2025), "Merging Feed-Forward Sublayers for Compressed Transformers".
"""

__version__ = "0.1.0"
