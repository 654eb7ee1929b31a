from stages.parallel import available_cores, ordered_map


def square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_in_and_out_of_process():
    tasks = list(range(50))
    assert list(ordered_map(square, tasks, parallel=True)) == [x * x for x in tasks]
    assert list(ordered_map(square, tasks, parallel=False)) == [x * x for x in tasks]
    assert available_cores() >= 1
