from dicom_ai_node.cli import main

main()
