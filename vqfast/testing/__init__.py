"""What vqfast is checked and measured against, shipped because `vqfast bench` and `vqfast demo` use it:

    oracle   the float64 brute force every exactness check compares with (shares no code with a backend)
    seeds    the classic N x K quantizers vqfast replaces (parity oracle and benchmark baseline)

The planted bugs of tests/test_mutations.py are test code: they live in tests/mutations.py, outside the package.
"""
