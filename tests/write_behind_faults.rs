//! Write-behind faults made on purpose (feature `failpoints`).
