from msr.cli import main

raise SystemExit(main())
