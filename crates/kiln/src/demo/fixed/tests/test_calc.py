import unittest

import calc


class CalcTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(calc.add(2, 3), 5)

    def test_shout(self):
        self.assertEqual(calc.shout("kiln"), "KILN")

    def test_lookup(self):
        table = {"a": 1}
        self.assertEqual(table["a"], 1)

    @unittest.skip("needs a network")
    def test_download(self):
        pass

    @unittest.expectedFailure
    def test_float_is_exact(self):
        self.assertEqual(0.1 + 0.2, 0.3)

    def test_add_strings(self):
        self.assertEqual(calc.add("a", "b"), "ab")


class TextTest(unittest.TestCase):
    def test_strip(self):
        print("noisy output from a test")
        self.assertEqual("  kiln ".strip(), "kiln")
