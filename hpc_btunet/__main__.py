from hpc_btunet.submit import main

raise SystemExit(main())
