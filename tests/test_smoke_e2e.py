def test_call_on_real_worker(grid):
    grid.worker("w1", "prefork", 2)
    m = grid.app_module
    assert m.add.call(1, 2) == 3
