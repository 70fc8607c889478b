"""RefiNet (paper section 5): a label hierarchy learned from a level-1
classifier's confusions, and level-2 networks per cluster of classes."""
