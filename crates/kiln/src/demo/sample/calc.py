"""A tiny module for the demo's tests to exercise."""


def add(a, b):
    return a + b


def shout(word):
    return word.upper() + "S"
