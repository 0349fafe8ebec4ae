import unittest

import calc


class CalcTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(calc.add(2, 3), 5)

    def test_shout(self):
        self.assertEqual(calc.shout("kiln"), "KILN")

    def test_lookup(self):
        table = {"a": 1}
        self.assertEqual(table["b"], 2)

    @unittest.skip("needs a network")
    def test_download(self):
        pass

    @unittest.expectedFailure
    def test_float_is_exact(self):
        self.assertEqual(0.1 + 0.2, 0.3)

    @unittest.expectedFailure
    def test_add_strings(self):
        # Marked as a known bug long ago, but it works: an unexpected success.
        self.assertEqual(calc.add("a", "b"), "ab")


class TextTest(unittest.TestCase):
    def test_strip(self):
        print("noisy output from a test")
        self.assertEqual("  kiln ".strip(), "kiln")
