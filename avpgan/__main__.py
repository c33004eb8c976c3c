from avpgan.cli import main

raise SystemExit(main())
