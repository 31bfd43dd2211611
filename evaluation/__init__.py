"""Evaluation of generated slides: conditioning fidelity (does the slide follow its mask?) and seams."""
