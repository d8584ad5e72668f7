"""Types of shmd's compiled core (shmd/_sys/_core.c, _writer.c, _reader.c)."""

from collections.abc import Callable, Sequence

MUTEX_SIZE: int
SEM_SIZE: int

def mutex_init(address: int, /) -> int: ...
def mutex_lock(address: int, timeout: float | None, /) -> int: ...
def mutex_unlock(address: int, /) -> int: ...
def sem_init(address: int, /) -> int: ...
def sem_post(address: int, /) -> int: ...
def sem_wait(address: int, timeout: float, /) -> int: ...
def sem_drain(address: int, /) -> None: ...
def fence() -> None: ...
def load_fence() -> None: ...

LAYOUT: dict[str, int]
COPY_BATCH_BYTES: int
DEFER_CURSOR_MIN_CAPACITY: int

class Writer:
    """The writer's hot path (shmd/_sys/_writer.c)."""

    seq: int
    reserved: int
    room_until: int
    closed: bool
    def __init__(
        self,
        *,
        control: object,
        ring: object,
        capacity: int,
        slot_size: int,
        write_seq: int,
        reserve_seq: int,
        slow: Callable[[bytes | bytearray | memoryview, int], int],
        on_blocking: Callable[[int], None],
    ) -> None: ...
    def publish(self, payload: bytes | bytearray | memoryview, topic: int = 0) -> int: ...
    def write_batch(
        self, payloads: Sequence[bytes | bytearray | memoryview], topic: int, /
    ) -> int: ...
    def reserve_to(self, end: int, /) -> None: ...
    def commit_reserved(self, count: int, topic: int, length: int, /) -> None: ...
    def set_readers(self, rows: Sequence[tuple[int, int, int]], /) -> None: ...
    def forget_sleepers(self) -> None: ...
    def close(self) -> None: ...

class Loan:
    """A held record's payload under the block policy (``memoryview.obj`` of a hold read's
    payload): its slot stays held while any view of it lives (shmd/_sys/_reader.c)."""

    seq: int
    held: bool

class Reader:
    """A reader's hot path (shmd/_sys/_reader.c)."""

    cursor: int
    delivered: int
    lost: int
    topics: int
    pending: bool
    spinning: bool
    hook: Callable[[int, int], object] | None
    def __init__(
        self,
        *,
        control: object,
        ring: object,
        ring_view: memoryview,
        capacity: int,
        slot_size: int,
        index: int,
        token: int,
        block: bool,
        eventfd: int,
        on_error: Callable[[int, int], None],
    ) -> None: ...
    def read_batch(
        self, limit: int = 4096, *, copy: bool = True, hold: bool = False
    ) -> list[tuple[int, int, int, bytes | memoryview]]: ...
    def prepare_sleep(self) -> float | None: ...
    def read_into(self, buffer: memoryview | bytearray, /) -> tuple[int, int, int, int] | None: ...
    def spin(self, spin_seconds: float, yield_seconds: float = 0.0, /) -> bool: ...
    def announce(self) -> None: ...
    def settle(self) -> None: ...
    def take(self, taken: int, released: int | None = None, /) -> None: ...
    def set_totals(self, delivered: int, lost: int, /) -> None: ...
    def close(self) -> None: ...
