from boostserve.cli import main

raise SystemExit(main())
