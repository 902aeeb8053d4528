from posvit_cli.app import main

main()
