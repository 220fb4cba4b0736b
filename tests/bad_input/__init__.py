"""Bad input, damaged stores, injections, signals and concurrent drivers, organised by command.

Every refusal is checked the same way (``common.assert_refused``): exit status 2, one line on
stderr naming the field, option, array or attribute, no traceback, and nothing left behind.
"""
