from edgelm.cli import main

raise SystemExit(main())
