"""Peak memory and time of one DPO step per method and sequence length (``dpo-fast profile-memory``).

    python benchmarks/profile_memory.py --model-config tiny --device cpu --output-dir benchmarks/results

See ``dpo_fast/app/profile_memory.py`` for what is measured; ``--help`` lists the options.
"""

import sys

from dpo_fast.app.profile_memory import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
