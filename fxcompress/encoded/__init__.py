"""Packed, entropy-coded weights: pure numpy / torch, imports no passes.

    bits       variable- and fixed-width codes packed into bytes (MSB first)
    positions  nonzero positions as relative indices with escape entries for long gaps
    huffman    canonical Huffman, decoded by table lookups in independent lanes
    rans       interleaved rANS (range asymmetric numeral systems) in numpy lanes
    streams    one interface over the coders: encode_symbols / decode_symbols
    tensor     a weight tensor as codebook + symbol streams (+ positions)
    module     EncodedWeight: the graph module that holds the bytes and decodes once
    decode     a lowered GraphModule back to plain float parameters
    memory     handing the encoder's freed memory back to the system between batches

The file format that saves any GraphModule (encoded or not) is fxcompress.fileformat.
"""
