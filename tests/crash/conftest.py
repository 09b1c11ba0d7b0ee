def pytest_terminal_summary(terminalreporter):
    from .test_power_loss import explored

    if explored["runs"]:
        terminalreporter.write_line(
            f"power-cut exploration: {explored['runs']} seeded workloads, {explored['cuts']} "
            "power cuts recovered and checked")
