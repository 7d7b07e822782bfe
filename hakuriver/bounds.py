"""Every size bound of the fabric, defined once.

Why it exists: a bound the receivers enforce but the sender does not check lets a message
through that is then dropped (dead-lettered) after the client printed its id. So the client
checks these very numbers before it sends anything, and the runners and the host enforce
them on arrival (through :mod:`hakuriver.messages` and the host's query parameters).

Plain constants, no imports: the CLI reads them while parsing the command line, before
pydantic or the broker client are loaded.
"""

INT64 = 1 << 63                          # the ledger stores integers as 64-bit signed

# -- messages ----------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 1 << 20              # any JSON message, as encoded on the wire
EVENT_ROOM_BYTES = 16 << 10              # what a state event adds around the task it carries
MAX_TASK_BYTES = MAX_MESSAGE_BYTES - EVENT_ROOM_BYTES   # a task, encoded: its queued event must fit too
MAX_CHUNK_BYTES = 64 << 10               # one output chunk
MAX_RPC_REPLY_BYTES = 8 << 20            # an output page of 4 MiB, base64-encoded, fits
MAX_EVENTS_PER_MESSAGE = 64              # state events sent together as one message (a JSON array)
COMBINED_EVENTS_BYTES = 256 << 10        # such an array stops growing before this; a larger event goes alone

# -- one task ----------------------------------------------------------------------------
MAX_ARG_BYTES = 128 << 10                # command + args together, UTF-8
MAX_ENV_BYTES = 128 << 10                # the user's environment, keys and values, UTF-8
MAX_MEMORY = INT64 - 1                   # bytes (--memory)
MAX_CORES = 1 << 16                      # --cores
MAX_NUMA_ID = (1 << 31) - 1              # node:N (a 32-bit column in the ledger)
MAX_GPUS = 1024                          # --gpus N, and GPU ids in node::IDS (ids below it)
MAX_RETRIES = 10                         # --retries N: at most this many runs after the first
DEFAULT_RETRY_DELAY_S = 3.0              # --retry-delay: seconds between a failed attempt and the next
MAX_RETRY_DELAY_S = 24 * 3600.0          # --retry-delay at most a day
MAX_AFTER = 1000                         # --after: tasks one task may wait for

# -- queries -----------------------------------------------------------------------------
MAX_LIST_LIMIT = 10_000                  # --list-tasks --limit; more goes page by page
LIST_PAGE_BYTES = 4 << 20                # a list reply stops before this many encoded bytes
LIST_TEXT_CHARS = 200                    # a list row's command line and message are cut to this
MAX_READ_BYTES = 4 << 20                 # one page of a task's stored output
