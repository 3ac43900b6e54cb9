import sys

from meta_vqa.cli import main

sys.exit(main())
