"""datafluence: which training examples made a network behave this way, and what does
learning one more example do to everything else it knows?"""

__version__ = "0.1.0"
