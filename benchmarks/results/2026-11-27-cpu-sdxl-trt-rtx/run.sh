cd /work/main
S=.venv/bin/python
E=/tmp/s12/sdxl-e16p
rm -rf $E
/usr/bin/time -f "export: %e s, peak RSS %M kB" $S -m sdexport export sdxl-random -o $E --dtype fp16 --components text_encoder,text_encoder_2,vae_decoder --max-batch 1
for c in text_encoder text_encoder_2 vae_decoder; do
  /usr/bin/time -f "build $c: %e s, peak RSS %M kB" $S -m sdexport build $E --components $c --static 1024x1024 --batch 1
  echo "build $c rc=$?"
done
ls -l $E/engines
