"""The sparse 3D study (issue: sparse 3D tokens): the seed-001 quantizer as written vs vqkit."""
