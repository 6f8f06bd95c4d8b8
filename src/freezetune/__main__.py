from freezetune.cli import main

raise SystemExit(main())
