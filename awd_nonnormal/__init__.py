"""awd-nonnormal: recurrent networks with sequential non-normal dynamics.

Implements Orhan & Pitkow, "Improved memory in recurrent neural networks with sequential
non-normal dynamics" (ICLR 2020) on top of a modern rewrite of the AWD-LSTM language-model code.
"""

__version__ = "0.1.0"
