"""Edit-quality benchmark in the style of REDEdit-Bench (issue 13, point 3).

* :mod:`.cases` -- the case file format, 30 generated cases, a reader for a local REDEdit-Bench;
* :mod:`.runner` -- editor configurations, the edit-and-score loop (the NFT stage's VLM judge and
  OCR reward, :mod:`.metrics`' masked PSNR / SSIM);
* :mod:`.report` -- the HTML report and the delta table between two runs.

Entry point: ``python -m bench.quality {make-cases, run, report, redbench}`` (see ``--help``).
"""
